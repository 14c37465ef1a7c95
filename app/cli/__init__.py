"""The ``clipshot`` console script (``app.cli.main:main``).

It lives above every other floor because its commands wire them together (``serve`` runs the app,
``train`` the trainers, ``eval`` the evaluation harness); the pure model in ``clipshot/`` knows nothing
of it. Nothing is imported here: ``clipshot --help`` must not pay for torch.
"""
