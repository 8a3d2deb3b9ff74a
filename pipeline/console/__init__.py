"""The operator console: a web page and a JSON management API over tasks, routes and users
(``dx console serve``). Pages are rendered on the server; every asset is served by dx itself."""
