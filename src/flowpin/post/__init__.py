"""Post-training (MODEL_FLOW stages 9-12): SFT, DPO, RLVR and evaluation on the verifiable tasks.

Shared pieces: :mod:`flowpin.post.prompts` (how a task becomes tokens: the prompt, a newline, the
response, EOS -- the same layout the pretraining mix saw) and :mod:`flowpin.post.lm` (log-probabilities
and seeded generation with the megatron GPT).
"""
