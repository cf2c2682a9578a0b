"""Fine-tuning through the swarm: the client holds a LoRA adapter and trains it while the
servers run the frozen blocks forward and backward (``swarm_node/training.py``).

``train_lora`` (``trainer.py``) runs it, told by ``FinetuneSettings`` (``settings.py``, which
imports no torch: the command line reads its flags from it).
"""
