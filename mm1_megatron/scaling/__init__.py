"""The scaling tools, one sub-package each: ``estimate`` (``mm1 estimate``), ``sweep``
(``mm1 sweep``, which uses the estimate) and ``report`` (``mm1 report``, which reads run
folders only). ``tests/unit/test_import_rules.py`` keeps them apart."""
