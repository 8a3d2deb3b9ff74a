"""The ``dx`` command line (typer): one module per command group."""

import warnings

# authlib (pulled in by confluent_kafka.schema_registry) warns about its own deprecations on
# import; that is not the operator's business and would break "one clear line" on failures.
# Set here, before any command module imports the registry client.
warnings.filterwarnings("ignore", module=r"authlib(\..*)?")
warnings.filterwarnings("ignore", message=r".*[Aa]uthlib.*")
