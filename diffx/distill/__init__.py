"""Few-step students by retraining (``diffx distill``): the model itself changes so it needs fewer steps.

- ``progressive``: a student takes in one DDIM step what its teacher takes in two; each round halves
  the steps (Salimans & Ho 2022);
- ``guided``: the teacher's classifier-free guidance is baked in, the scale ``w`` becoming an input,
  then progressive rounds (Meng et al. 2023): one forward pass per step instead of two;
- ``reflow``: (noise, sample) pairs from a flow teacher's ODE, cached to disk, and a student trained on
  the straight paths between them, so one or two Euler steps follow it (Liu et al. 2023, InstaFlow);
- ``loop``: the student training loop they share (EMA, progress, exact resume, atomic checkpoints).

Each student is a ``model.safetensors`` like any other, recording its native steps and time grid
(``checkpoint.save(sampling=...)``), which ``diffx sample`` and ``diffx eval`` use by default.
"""
