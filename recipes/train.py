"""Sparse training of any timm model with ITOP, launched by Accelerate.

    accelerate launch recipes/train.py --config recipes/configs/fashion_mnist_rigl_itop.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py --config ... --train.epochs 1
    python recipes/train.py --config ... --sparsity.density 0.05      # one process
    python recipes/train.py --help                                    # every config key

The loop itself lives in ``itop_timm/training/loop.py`` (a plain Accelerate loop) so that
``itop-timm train`` runs exactly the same code.
"""

from itop_timm.training import main

if __name__ == "__main__":
    main()
