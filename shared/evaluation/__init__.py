"""Evidence that a LoRA works, computed by the trainer for every job: scores at checkpoints and at the
end, verdicts with thresholds ("no visible effect", "overfitting / collapse", "never stops",
"repeats"), the best checkpoint, and a self-contained report.

- `judge.py`: what the training loop calls (`Judge`);
- `images.py`, `texts.py`: the scores of pictures and of answers, for any family whose task
  implements `render` or `answer` (shared/training/task.py);
- `verdicts.py`: the verdicts and the thresholds that decide them (settings in
  shared/schema/evaluation.py);
- `report.py`, `charts.py`, `report.html.j2`: report.html and report.json.

Nothing here imports a model family's code: the tasks bring their pictures and answers.
"""
