"""Apache Beam pipelines that build remote-sensing image-text corpora.

Pure functions first (``stages/``, ``sources/``), Beam wrappers second; ``recipes/`` compose
sources + stages + the sink of ``sinks/``.
"""

__version__ = "0.1.0"
