"""The Amazon Nova Sonic upstream: ``NovaUpstream`` in :mod:`edgevoice.nova.upstream`.

Nothing here imports the AWS SDK at import time; only :mod:`edgevoice.nova.client`
does, lazily, so the package imports on Python 3.11 without the ``nova`` extra.
"""
