"""psdclip.eval: the evaluation stage, between training and the index. Suites (synthetic, imagefolder, imagenet,
retrieval, CLIP_benchmark's wds layout), their metrics, the image-feature cache, CLIP_benchmark's result format and
the comparison of runs. It uses the training stage's model loading only."""
