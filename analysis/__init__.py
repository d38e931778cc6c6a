"""Analyses of hard view selection from the selection logs of any training run
(paper Section 5 and Appendix D).

A run trained with ``run.selection_log_every > 0`` leaves
``RUN/selection/rank*_steps*.npz``: the augmentation parameters of every
candidate view, the combinations compared, their scores (per-sample losses)
and the choice, every K steps.  From them:

- :mod:`analysis.logs`: :func:`~analysis.logs.load_selection` reads a run's
  logs (all ranks and files) into one :class:`~analysis.logs.SelectionData`;
  :class:`~analysis.logs.AnalysisError` is every user error;
- :mod:`analysis.metrics`: metrics of a pair of views (IoU, relative centre
  distance, colour-jitter distance, per-parameter differences, area ratio);
- :mod:`analysis.iou`: IoU of the selected pairs, how often the selected pair
  is the lowest-IoU pair, IoU over training (Fig. 3, Fig. 4 left);
- :mod:`analysis.fanova`: first-order functional ANOVA over a random forest;
- :mod:`analysis.importance`: fANOVA importance of the pair metrics for the
  loss (Fig. 8);
- :mod:`analysis.predict`: gradient-boosted trees predicting the selected pair
  from the parameters (Section 5.2).

Command lines (each writes ``OUTPUT/<name>.json`` and ``OUTPUT/<name>*.png``;
``--help`` says more)::

    python -m analysis.iou --run RUN [--baseline RUN] --output DIR
    python -m analysis.importance --run RUN --output DIR
    python -m analysis.predict --run RUN [RUN ...] --output DIR

Pairs are always slots 0 and 1 of a combination: the pair itself for SimSiam
and SimCLR, the two global crops for DINO and iBOT (every JSON says so in
``pair_definition``).

Nothing is imported here, so that ``python -m analysis.<name>`` loads only
what that analysis needs.
"""
