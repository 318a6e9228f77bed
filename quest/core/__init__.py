"""The training core: models, data, losses, methods, codebook, engine and checkpoints. Imports
torch, torchvision, numpy and `quest.infra`, never `quest.apps`."""
