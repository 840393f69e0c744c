"""API keys, limits and tenants: ``app.auth.stage.AuthStage`` is the request pipeline's authentication and
limiting stage; ``app.auth.principal.Principal`` is who is calling (with the errors of authentication and
limiting). See docs/auth.md."""
