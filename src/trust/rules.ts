/**
 * CONNECT THROUGH rules as the gateway holds them in memory (loaded from `trustgate.connect_rule`),
 * and the decision they make: may trusted user T act as proxy user P with ProxyRole R, and which
 * PostgreSQL role does the pooled connection then run as. Pure: no I/O.
 *
 * The mapping (docs/trusted-sessions.md, "Identity mapping"):
 *   PERMANENT … WITHOUT ROLE: omitted / ALL / NONE → P itself (its own privileges and the roles it
 *     inherits); a role name r → r, if PostgreSQL confirms P may SET ROLE r (`memberCheck`).
 *   WITH ROLE r1…rn (permanent or application): omitted / ALL → r1 when n = 1, else the rule's union
 *     role (member of every ri); a role name → that role if the rule lists it; NONE → error.
 */
import { PgError, SqlState } from '../protocol/sqlstate.js';
import type { ProxyRole } from './query-band.js';

export type ProxyKind = 'permanent' | 'application';

export interface ConnectRule {
  proxyUser: string;
  kind: ProxyKind;
  withoutRole: boolean;
  roles: readonly string[];
  /** Role holding all `roles` (when there are two or more). */
  unionRole: string | null;
}

export interface TrustedUserRules {
  trustOnly: boolean;
  proxies: Map<string, ConnectRule>;
}

/** One row of `trustgate.connect_rule` (active rows only). */
export interface ConnectRuleRow {
  trusted_user: string;
  proxy_user: string | null;
  kind: string;
  without_role: boolean;
  roles: readonly string[];
  union_role: string | null;
}

export function buildRuleSet(rows: Iterable<ConnectRuleRow>): Map<string, TrustedUserRules> {
  const set = new Map<string, TrustedUserRules>();
  for (const row of rows) {
    let rules = set.get(row.trusted_user);
    if (!rules) set.set(row.trusted_user, (rules = { trustOnly: false, proxies: new Map() }));
    if (row.kind === 'trust_only') rules.trustOnly = true;
    else if (row.proxy_user !== null && (row.kind === 'permanent' || row.kind === 'application')) {
      rules.proxies.set(row.proxy_user, {
        proxyUser: row.proxy_user,
        kind: row.kind,
        withoutRole: row.without_role,
        roles: row.roles,
        unionRole: row.union_role,
      });
    }
  }
  return set;
}

/** What the pooled connection of the trusted user becomes for a proxy. */
export interface ProxyGrant {
  proxyUser: string;
  kind: ProxyKind;
  /** The ProxyRole in force as written: a role name, 'ALL', 'NONE', or null when omitted. */
  roleLabel: string | null;
  /** The PostgreSQL role the connection is switched to (CURRENT_USER while the proxy is active). */
  targetRole: string;
  /** Proxy user whose membership in targetRole PostgreSQL must confirm at the switch, if any. */
  memberCheck: string | null;
}

const q = (name: string): string => `"${name.replace(/"/g, '""')}"`;

/**
 * The grant for a proxy, or null when the band names no proxy. Throws PgError (42501 not granted,
 * 22023 invalid ProxyRole use) naming the trusted and proxy users.
 */
export function authorizeProxy(
  trustedUser: string,
  rules: TrustedUserRules | undefined,
  proxyUser: string | undefined,
  proxyRole: ProxyRole | undefined,
): ProxyGrant | null {
  if (proxyUser === undefined) {
    if (proxyRole === undefined) return null;
    throw new PgError(SqlState.InvalidParameterValue, 'ProxyRole can only be set while a ProxyUser is in force', undefined, undefined, 'Set ProxyUser in the same band or in the session band.');
  }
  const rule = rules?.proxies.get(proxyUser);
  if (!rule) {
    throw new PgError(
      SqlState.InsufficientPrivilege,
      `trusted user ${q(trustedUser)} has no CONNECT THROUGH rule for proxy user ${q(proxyUser)}`,
      undefined,
      undefined,
      `An administrator can grant one: GRANT CONNECT THROUGH ${q(trustedUser)} TO [PERMANENT] ${q(proxyUser)} …`,
    );
  }
  const roleLabel = proxyRole === undefined ? null : proxyRole.kind === 'role' ? proxyRole.name : proxyRole.kind.toUpperCase();
  const grant = (targetRole: string, memberCheck: string | null = null): ProxyGrant => ({ proxyUser, kind: rule.kind, roleLabel, targetRole, memberCheck });
  if (rule.withoutRole) {
    if (proxyRole?.kind !== 'role' || proxyRole.name === proxyUser) return grant(proxyUser);
    return grant(proxyRole.name, proxyUser);
  }
  if (proxyRole === undefined || proxyRole.kind === 'all') {
    if (rule.roles.length === 1) return grant(rule.roles[0]);
    if (!rule.unionRole) {
      throw new PgError(SqlState.ObjectNotInPrerequisiteState, `the CONNECT THROUGH rule for proxy user ${q(proxyUser)} has no union role; grant it again`);
    }
    return grant(rule.unionRole);
  }
  if (proxyRole.kind === 'none') {
    throw new PgError(
      SqlState.InvalidParameterValue,
      `ProxyRole NONE is not allowed for proxy user ${q(proxyUser)}: its CONNECT THROUGH rule through ${q(trustedUser)} is WITH ROLE ${rule.roles.map(q).join(', ')}`,
      undefined,
      undefined,
      'Omit ProxyRole or use ALL for all of the rule\'s roles, or name one of them.',
    );
  }
  if (!rule.roles.includes(proxyRole.name)) {
    throw new PgError(
      SqlState.InsufficientPrivilege,
      `role ${q(proxyRole.name)} is not in the CONNECT THROUGH rule for proxy user ${q(proxyUser)} through trusted user ${q(trustedUser)}`,
      undefined,
      undefined,
      `The rule allows: ${rule.roles.map(q).join(', ')}.`,
    );
  }
  return grant(proxyRole.name);
}
