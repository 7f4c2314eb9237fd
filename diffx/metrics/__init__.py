"""Sample-quality metrics: what ``diffx eval metrics=[...]`` and ``train.eval_every`` report.

- ``fid.py``: the Frechet distance and the unbiased KID estimator, pure math over feature arrays;
- ``inception.py``: the TF-Inception feature network (pool3, 2048-d) of FID, loaded from a pinned file;
- ``classifier.py``: a small CNN trained on a labelled training set (accuracy of samples, its features);
- ``reference.py``: features of the training data, cached on disk by data config and network;
- ``suite.py``: the metric names of ``metrics=[...]`` -> functions over one set of generated samples.
"""
