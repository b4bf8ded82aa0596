"""MELTR (Meta Loss TRansformer) on a UniVL-style video-text backbone.

Modules:
    meltr      the loss network (MATH.md section 4), the bilevel objectives, the meta-batch sampler
    univl      the backbone (text / video / cross encoders, caption decoder) and its 8 pretext losses
    data       the offline moving-digits clips, the tokenizer, the collate function, MSRVTT / YouCook2 loaders
    metrics    retrieval R@k / MedR and captioning BLEU / ROUGE-L / CIDEr-D
    pretrain   ``python -m examples.meltr_video.pretrain``: plain pretraining on the sum of the pretext losses
"""
