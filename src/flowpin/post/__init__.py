"""Post-training (MODEL_FLOW stages 9-12): SFT, DPO, RLVR and evaluation on the verifiable tasks.

The three training stages are spec builders (:mod:`flowpin.post.sft`, :mod:`flowpin.post.dpo`,
:mod:`flowpin.post.rlvr`) run by the training engine's one runner (:mod:`flowpin.train.spec`); what they
share lives in one place each:

* :mod:`flowpin.post.prompts` -- how a task becomes tokens (the prompt, a newline, the response, EOS -- the
  same layout the pretraining mix saw) and the tokenizer (:func:`~flowpin.post.prompts.open_vocab`);
* :mod:`flowpin.post.inputs` -- the tasks a stage reads (task kinds, a split's tasks, the first per kind) and
  the upstream checkpoint (latest, weights digest, fit to the tokenizer);
* :mod:`flowpin.post.examples` -- packed examples, their digest and seeded batches, the response-token loss;
* :mod:`flowpin.post.heldout` -- held-out pass@1 and solution loss before and after a stage;
* :mod:`flowpin.post.verifiers` -- the one grader (RLVR rewards, held-out and eval pass@1);
* :mod:`flowpin.post.lm` -- log-probabilities and seeded generation with the megatron GPT.

:mod:`flowpin.post.eval` is the eval stage (stage 12); it composes :mod:`~flowpin.post.eval_config` (the recipe),
:mod:`~flowpin.post.eval_inputs` (checkpoints, held-out sets, the decontamination report and their checks),
:mod:`~flowpin.post.eval_metrics` (bits per byte, greedy pass@1) and :mod:`~flowpin.post.eval_report` (the
table, markdown and report), in that import order.
"""
