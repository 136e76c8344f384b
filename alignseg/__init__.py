"""AlignSeg: Feature-Aligned Segmentation Networks (Huang et al., TPAMI 2021), on Triton."""

__version__ = "0.1.0"
