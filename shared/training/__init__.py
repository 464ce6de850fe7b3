"""The parts of the one training loop (shared/train.py) that every task shares.

- `task.py`: what a model family supplies (the Task interface) and the registry that finds it;
- `precision.py`: the device and the precision the weights are stored and computed in;
- `optim.py`: the optimizer and the learning-rate schedule;
- `state.py`: resumable training states (one format for every task) and keep-last-N;
- `events.py`: the events a job sends, their fields, for every task;
- `ranks.py`: what the processes of a data-parallel run agree on inside the loop;
- `launch.py`: starting a multi-process run through `accelerate launch` (above the loop).
"""
