"""Downstream adaptation: task heads, linear probe and fine-tune for the four clinical tasks.

    (DownstreamConfig, the recipe's `downstream:` section, is engine/downstream_config.py:
    engine/config.py composes it into the Recipe without importing this package)
    data.py        sample list and split counts from the shards, label-fraction draw over patients
    backbone.py    export / checkpoint / official / random backbones -> pooled or grid features;
                   the device a run uses
    features.py    a split's features through a frozen backbone, computed once (disk cache)
    tasks.py       view, ef, grade, seg: labels, losses, metrics
    heads.py       VideoHead (linear / MLP), SegDecoder (light decoder on the token grid)
    metrics.py     accuracy, macro-F1, AUROC, MAE, RMSE, R^2, Dice, patient bootstrap CIs
    evaluation.py  clip-averaged predictions -> metrics -> PNGs / CSV
    probe.py       linear probe and compare_backbones (the demo's last step)
    finetune.py    full fine-tune on the pretraining Trainer (same step, checkpoints, resume,
                   per-rank data), layer-wise lr decay
    plots.py       confusion matrix, EF scatter + Bland-Altman, segmentation overlays
    run.py         `echofm finetune` / `echofm evaluate`
"""
