"""Evaluation machinery: FID, IS, precision/recall, PSNR/SSIM, codebook and reference statistics."""
