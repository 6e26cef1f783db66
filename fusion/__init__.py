"""Weight-space fusion (docs/design.md section 8): parents in, one new network out; the parents are never changed.

- ``vanilla_avg``: parameter-wise mean of identical architectures (``transport.py``).
- ``otfusion`` (Singh & Jaggi 2020): align every parent's neurons to an anchor's with exact optimal
  transport, layer by layer, then average (``transport.py``).
- ``clafusion`` (Nguyen et al. 2022): parents of different depths; align their hidden layers by
  dynamic programming, insert identity layers into the shallower one, then ``otfusion``
  (``cross_layer.py``).
- Neuron interpolation (Luenam et al. 2025): ``hungarian_fusion`` (HF, two parents), ``kf_linear``
  and ``kf_gradient`` (KF, any number), with uniform or conductance importance (``interpolation.py``).
- Ensembles of the parents' outputs, the baseline fusion has to beat (``ensemble.py``).

ResNets (archs/resnet.py) go to their own modules through the same functions: ``residual.py`` (channel spaces,
averaging, OTFusion, batch-norm statistics), ``residual_fit.py`` (HF and KF, a block as a level) and
``residual_depth.py`` (CLAFusion with identity blocks); docs/fusion_resnet.md.

Other parents are MLPs, VGG-style CNNs or LeNet5s (archs/mlp.py, archs/vgg.py, archs/lenet.py) of one family,
reading the same inputs and predicting the same classes; a "level" is one Linear or Conv2d layer (hidden
layers, then the output layer), a convolution's channel is a neuron, and neurons are compared through
their incoming weights (a kernel flattened) or their pre-activations (before the ReLU) on a few hundred
samples (a channel's at every position, or averaged over positions). ``_common.py`` says how a level's
alignment moves the next level's input channels, across the flatten too.
"""
from fusion._common import FUSABLE
from fusion.cross_layer import (align_layers, clafusion, finetune, insert_identity_layers, layer_cost_matrix,
                                 linear_cka, stages)
from fusion.ensemble import class_share_weights, ensemble_softmax
from fusion.interpolation import (conductance_importance, hungarian_fusion, kf_gradient, kf_linear,
                                  uniform_importance)
from fusion.residual import recompute_norm_statistics
from fusion.transport import HAS_POT, POT_MISSING, otfusion, vanilla_avg

__all__ = [
    "FUSABLE", "HAS_POT", "POT_MISSING", "align_layers", "class_share_weights", "clafusion", "conductance_importance", "ensemble_softmax", "finetune",
    "hungarian_fusion", "insert_identity_layers", "kf_gradient", "kf_linear", "layer_cost_matrix", "linear_cka",
    "otfusion", "recompute_norm_statistics", "stages", "uniform_importance", "vanilla_avg",
]
