"""VICReg (Bardes et al. 2022, Section 4.2): a ResNet encoder and an expander of
three linear layers (8192-8192-8192 on ImageNet), the first two followed by
BatchNorm and ReLU, the last without BatchNorm: Barlow Twins' projector, with
biases in the two hidden linear layers (official code).  The loss is applied
to the expander's output, the representation is the encoder's."""
from barlowtwins.model import BarlowTwins


class VICReg(BarlowTwins):
    hidden_bias = True
