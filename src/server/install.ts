/**
 * Installs what trustgate needs inside a database: the `trustgate` schema with the restricted
 * secret-lookup function used by the auth query, the role allowed to call it, and the
 * trusted-sessions catalog (src/trust/catalog-sql.ts), then the audit schema (src/audit/audit-sql.ts).
 */
import { trustCatalogSql } from '../trust/catalog-sql.js';
import { auditSql } from '../audit/audit-sql.js';
import { ServerConnection, type ServerEndpoint } from './server-connection.js';
import type { Logger } from '../log/logger.js';

export function authFunctionSql(authRole: string): string {
  const role = `"${authRole.replace(/"/g, '""')}"`;
  return `
CREATE SCHEMA IF NOT EXISTS trustgate;
-- Secrets of login roles only, never of superusers (as PgBouncer recommends for auth_query).
CREATE OR REPLACE FUNCTION trustgate.user_secret(p_user text)
  RETURNS TABLE (username text, secret text)
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
AS $fn$
  SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid
  WHERE rolname = p_user AND rolcanlogin AND NOT rolsuper
    AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
$fn$;
REVOKE ALL ON FUNCTION trustgate.user_secret(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA trustgate TO ${role};
GRANT EXECUTE ON FUNCTION trustgate.user_secret(text) TO ${role};
`;
}

export interface InstallOptions {
  endpoint: ServerEndpoint;
  database: string;
  superuser: string;
  superuserPassword: string;
  authRole: string;
  /** Creates the auth role with this password if it does not exist. */
  authRolePassword?: string;
}

export const MIN_TRUSTED_SESSIONS_VERSION = 160000;

/** Runs the install as a superuser (idempotent): the auth function, then the trusted-sessions catalog. */
export async function installAuthFunction(o: InstallOptions, log: Logger): Promise<void> {
  const conn = await ServerConnection.connect(o.endpoint, o.database, o.superuser, { password: o.superuserPassword }, new Map(), log);
  try {
    if (o.authRolePassword !== undefined) {
      const pw = o.authRolePassword.replace(/'/g, "''");
      const role = o.authRole.replace(/"/g, '""');
      await conn.internalQuery(
        `DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${o.authRole.replace(/'/g, "''")}') THEN CREATE ROLE "${role}" LOGIN PASSWORD '${pw}'; END IF; END $$`,
      );
    }
    await conn.internalQuery(authFunctionSql(o.authRole));
    // Trusted sessions map rules onto role memberships WITH SET TRUE, INHERIT FALSE (PostgreSQL 16+).
    const version = Number((await conn.internalQuery('SHOW server_version_num')).rows[0]?.[0] ?? 0);
    if (version < MIN_TRUSTED_SESSIONS_VERSION) {
      log.warn({ database: o.database, serverVersion: version }, 'trusted sessions need PostgreSQL 16 or newer: the trustgate catalog was not installed (pooling and the auth function work)');
      return;
    }
    await conn.internalQuery(trustCatalogSql(o.authRole), undefined, 30_000);
    // Query log, access log, creators (src/audit/audit-sql.ts): needs the catalog's identity().
    await conn.internalQuery(auditSql(o.authRole), undefined, 30_000);
  } finally {
    conn.terminate();
  }
}
