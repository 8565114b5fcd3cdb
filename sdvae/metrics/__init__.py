"""Image-quality metrics shared by training and evaluation: PSNR/SSIM and LPIPS."""
