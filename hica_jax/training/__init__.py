"""Training, one module per objective, all driven by loop.train_loop.

loop.py: optimiser, train state, the jitted-step wrapper and the loop
(metrics, checkpoints, preemption, non-finite steps). stage1.py: domain
pretraining. stage2.py: HiCA alignment (the stage and every few-shot run).
supervised.py: the cross-entropy baseline. gradcache.py: large contrastive
batches in chunks.
"""
