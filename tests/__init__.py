"""
Vespa's tests. tox makes every DeprecationWarning an error (PYTHONWARNINGS); the one filter here
lets through a deprecation that Vespa cannot avoid, and only that one. It is set here, in every
trial process (-j workers too), as a pattern: trial emits a warning again after each test with
its file path (``.../OpenSSL/SSL``) where a module name (``OpenSSL.SSL``) would be.
"""

import warnings

# Twisted's CertificateOptions (the public API for TLS settings, also behind
# PrivateCertificate.options()) hands pyOpenSSL X509 and PKey objects to OpenSSL.SSL.Context,
# which pyOpenSSL 24.3 and later deprecate; the API takes no other kind.
warnings.filterwarnings(
    "ignore",
    message=r"Passing pyOpenSSL (X509|PKey) objects is deprecated",
    category=DeprecationWarning,
    module=r"(.*/)?OpenSSL[./]SSL\Z",
)
