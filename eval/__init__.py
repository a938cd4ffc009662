"""Measures: FID/KID/CLIP/PSNR, prompt sets, latency, reports."""
