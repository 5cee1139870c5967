"""PyTorch reference backbones (timm / torchvision state-dict naming)."""
