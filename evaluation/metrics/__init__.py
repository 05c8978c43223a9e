"""One metric per module; each takes images as `N x 3 x H x W` tensors in `[-1, 1]` and returns one score per
image. Heavy models (LPIPS, CLIP, face recognition) are passed in, so tests inject tiny ones."""
