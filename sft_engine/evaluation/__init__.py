"""Evaluation: every suite behind one interface (``suite``), listed once (``registry``), one module per suite.

Built in: ``heldout`` (held-out loss), ``knowledge`` (lm-eval multiple choice), ``ifbench`` (instruction
following), ``verifiable`` (the demo's task generator, exact match). A team's own, from files: ``generation``,
``multiple_choice`` and ``loss`` (``conversation_loss``). ``report`` builds the base-vs-tuned table and applies the
gate; ``items`` reads the built-in suites' items from installed packages.
"""
