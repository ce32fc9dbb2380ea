"""Stage 6 (notebook 06): organ segmentation and the organ crops it enables.

Entry point: `train.run_segmentation(config)`; `organ_crops.organ_crop_cache` for notebook 03.

    train        masks aligned to the cache, the 3D U-Net, organ boxes and areas per slice
    organ_crops  crop caches around one organ, and the segmentation model a run carries
"""
