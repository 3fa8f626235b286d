/**
 * The identity a pooled server connection runs under, and how the gateway puts it there.
 *
 * A switch is one prepared statement, executed on the server connection before the request:
 * `set_config('role', …)` (PostgreSQL checks the trusted user's SET membership), plus the settings
 * `trustgate.identity` (a JSON text) and `trustgate.identity_mac` (HMAC-SHA256 of it with the key
 * stored in the database). `trustgate.identity()` verifies the MAC, the backend pid and the session
 * user before SQL (row-level-security policies) may trust it, so SQL that writes the settings by
 * itself (e.g. dynamic SQL in a function) cannot forge an identity.
 */
import { createHmac } from 'node:crypto';
import type { QueryBand } from './query-band.js';
import type { ProxyGrant } from './rules.js';

/** What a client wants its server connection to be. Immutable; compared by `key`. */
export interface Identity {
  /** '' = the trusted user itself with no band: the state of a fresh connection. */
  readonly key: string;
  readonly role: string;
  readonly grant: ProxyGrant | null;
  readonly band: QueryBand | null;
  readonly sessionBand: QueryBand | null;
  readonly transactionBand: QueryBand | null;
}

export const NO_IDENTITY: Identity = Object.freeze({ key: '', role: 'none', grant: null, band: null, sessionBand: null, transactionBand: null });

/** The server's identity is not known (a rollback or error may have undone a switch). */
export const UNKNOWN_IDENTITY_KEY = '\u0000unknown';

export function makeIdentity(grant: ProxyGrant | null, sessionBand: QueryBand | null, transactionBand: QueryBand | null, band: QueryBand | null): Identity {
  if (!grant && !band) return NO_IDENTITY;
  const role = grant?.targetRole ?? 'none';
  const key = [role, grant?.proxyUser ?? '', grant?.roleLabel ?? '', grant?.memberCheck ?? '', transactionBand?.toString() ?? '', sessionBand?.toString() ?? ''].join('\u0001');
  return Object.freeze({ key, role, grant, band, sessionBand, transactionBand });
}

/** The JSON text stored in `trustgate.identity` for one server backend. */
export function identityToken(identity: Identity, trustedUser: string, backendPid: number): string {
  const g = identity.grant;
  return JSON.stringify({
    v: 1,
    pid: backendPid,
    tu: trustedUser,
    pu: g?.proxyUser ?? null,
    pr: g?.roleLabel ?? null,
    k: g?.kind ?? null,
    role: g ? g.targetRole : trustedUser,
    qb: identity.band?.toString() ?? null,
    tb: identity.transactionBand?.toString() ?? null,
    sb: identity.sessionBand?.toString() ?? null,
  });
}

export function identityMac(key: Buffer, token: string): string {
  return createHmac('sha256', key).update(token, 'utf8').digest('hex');
}

/** The trusted-request key of a trusted user (what `trustgate.trust_key(t)` returns). */
export function trustKeyFor(key: Buffer, trustedUser: string): string {
  return createHmac('sha256', key).update(`trusted-request:${trustedUser}`, 'utf8').digest('hex');
}

/** Server-side statement names of the two switch statements (prepared once per connection). */
export const SWITCH_STATEMENT = 'tg_switch';
export const SWITCH_MEMBER_STATEMENT = 'tg_switch_m';

const SETTINGS = "set_config('trustgate.identity', $2, $4::bool), set_config('trustgate.identity_mac', $3, $4::bool)";
export const SWITCH_SQL = `SELECT set_config('role', $1, $4::bool), ${SETTINGS}`;
/** With a membership PostgreSQL must confirm first (ProxyRole under a WITHOUT ROLE rule). */
export const SWITCH_MEMBER_SQL = `SELECT set_config('role', trustgate.assert_proxy_role($5, $1), $4::bool), ${SETTINGS}`;
