"""Modules over the op layer (fastgan.ops).

    plan          how a Sequential's children group into conv -> BatchNorm? -> activation steps
    layers        FusedSequential and fuse(): the same children, a fused forward (level L1)
    fused_conv    level L2 for FusedSequential: runs of 4x4 convolutions as one conv chain; set_level
    models        the drop-in Generator / Discriminator / DCGAN (train_step, step_for, d_loss, g_loss)
    step          the train step (StepRecipe, TrainStep) and level L3, the step as CUDA graphs (CapturedStep)
    losses        GAN losses on logits: bce (fused), lsgan, hinge, wgan-gp
    reference     examples/dcgan's models, optimizers and train step: what fastgan is checked against
    presets       the classic DCGAN variants as reference nn.Sequentials with their recipes
    checkpoint    load_checkpoint: DataParallel keys, clear errors on a mismatch
    distributed   torchrun / DDP helpers and sync_batchnorm
"""
