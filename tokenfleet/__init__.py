"""The top floor of tokenfleet: the ``tokenfleet`` command and the process supervisor.

Packages depend downwards only: ``shared`` (settings, protocol, keys) is imported by
``gateway`` and ``worker``; this package imports those (lazily, per subcommand); ``bench``
uses gateway, worker and this package's supervisor. Nothing below imports ``tokenfleet``.
"""
