"""The Data Exchange API: REST over the entities declared in dx.yaml's ``api:`` section.

``catalog`` checks the declarations against the live database and builds the runtime entities;
``validate`` turns request bodies into column values (the inbound coercers, plus the field rules);
``query`` builds list/read SQL; ``store`` runs writes in one transaction (or one savepoint per
row) with ``dx.origin`` set to the API key's system; ``security`` holds keys, scopes and rate
limits; ``openapi`` renders the document; ``app`` wires them into a FastAPI application.
"""
