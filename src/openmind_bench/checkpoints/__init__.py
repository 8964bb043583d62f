"""External pre-training checkpoints (issue 20, "bring your own checkpoint"): where they come from
(`sources`: a local file, `hf://` model repositories through huggingface_hub, `https://` with a
sha256), what formats load (ours, nnssl's `AbstractTrainer.save_checkpoint` layout, the published
`openmind-models` repository layout), the check before any GPU hour (`check`), and the export of our
own runs in the published layout (`export`).

It sits above the downstream stage (the check runs the fine-tuning transfer) and below the CLI.
"""
