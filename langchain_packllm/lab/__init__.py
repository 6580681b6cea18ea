"""The lab: what is built around the fusion, imported only by those who ask for it.

- :mod:`~langchain_packllm.lab.pack`: the domain-expert pack (corpora from Debian packages, training,
  the on-disk pack builder) and the real pretrained pack (GGUF members from PyPI packages).
- :mod:`~langchain_packllm.lab.evaluation`: the paper's protocols (language modelling, multiple choice).
- :mod:`~langchain_packllm.lab.bench`: ``packllm bench``, speed and memory against the members' own cost.
- :mod:`~langchain_packllm.lab.demo` and :mod:`~langchain_packllm.lab.cli`: the ``packllm`` command.

``import langchain_packllm`` imports none of this: a LangChain user gets the fusion only.
"""
