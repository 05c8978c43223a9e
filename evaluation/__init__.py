"""Metrics over folders of edits (PSNR, SSIM, LPIPS, CLIP-S, CLIP-I, FR), the tables they fill and a report."""
