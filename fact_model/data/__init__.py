"""Datasets for training and checking concept explanations.

* :mod:`fact_model.data.synthetic` — the embedded dataset: seeded images of classes made of
  shared parts, with a ground-truth part map per pixel (known concepts);
* :mod:`fact_model.data.folder` — image folders (``ROOT/<class>/`` and ImageNet's
  ``ROOT/{train,val,test}/<class>/``), listed up front, decoded when read;
* :mod:`fact_model.data.digits` — scikit-learn's real handwritten digits exported as a folder;
* :mod:`fact_model.data.export` — the embedded dataset written out as PNG folders (``fact data export``);
* :mod:`fact_model.data.sources` — which split of which source a command reads (:class:`DataSpec`);
* :mod:`fact_model.data.loading` — the one streamed path every command reads batches through.
"""
