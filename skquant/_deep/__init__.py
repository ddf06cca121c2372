"""Deep learning: where skquant uses torch.

The deep estimators and their parts: network building and the training loop
(``_torch.py``), the losses (``_losses.py``, ``_dsq_losses.py``),
:class:`~skquant.DeepQuantizer` (DQN, ``_dqn.py``) and
:class:`~skquant.SphericalQuantizer` (DSQ, ``_dsq.py``). Everything outside
this subpackage imports torch lazily, if at all.
"""
