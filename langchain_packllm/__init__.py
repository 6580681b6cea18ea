"""langchain-packllm (alignment branch stub).

This branch carries only ``langchain_packllm.alignment``; the package's real ``__init__`` lives on the main
branch. It exists so that this checkout's modules win over an editable install of another checkout.
On merge, keep main's ``__init__.py``.
"""
