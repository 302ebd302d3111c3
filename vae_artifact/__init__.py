"""The artifact contract: the one file ``training`` writes and ``service`` serves (docs/architecture.md).

One module per concern, each importable on its own (``metadata``, ``complexity`` and ``calibration`` import no
torch, so light clients stay light):

- ``metadata``: format version, exported method names, the metadata.json schema as typed values validated on
  load (``Metadata.from_dict``), and a torch-free reader of the embedded document;
- ``io``: atomic save, load with every refusal, the weights and file hashes, the TorchScript warnings filter;
- ``noise``: the scoring noise every anomaly score uses, and the default K;
- ``complexity``: the lossless compressors behind the ``nll-minus-<compressor>`` score kinds;
- ``calibration``: conformal p-values, thresholds and the importance-weight statistics.

Torch, numpy and Pillow only: no model code, no web framework. ``training`` and ``service`` both import this
package and never each other.
"""
