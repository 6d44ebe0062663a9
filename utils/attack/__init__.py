"""The attack (SPEC "The attack"): ``craft`` holds its mathematics as functions (also importable as
``attack_generator``); ``attacker`` holds its role in an online run. A new attack is a function in ``craft`` and,
to run it online, an ``Attacker`` that calls it."""
