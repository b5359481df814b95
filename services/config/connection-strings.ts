/**
 * Connection settings from the environment, in the URL form and in the legacy .NET form the
 * original ai-maestro services used (`ConnectionStrings__MariaDb`, `ConnectionStrings__Redis`).
 * An empty variable counts as unset. Errors are one clear line naming what is wrong.
 */

/** The keys of a legacy MariaDB connection string we understand (lower case, spaces removed). */
const HOST_KEYS = ['server', 'host', 'datasource', 'address', 'addr', 'networkaddress']
const PORT_KEYS = ['port']
const DATABASE_KEYS = ['database', 'initialcatalog']
const USER_KEYS = ['user', 'uid', 'userid', 'username']
const PASSWORD_KEYS = ['password', 'pwd']

function nonEmpty (v: string | undefined): string | undefined {
  return v === undefined || v.trim() === '' ? undefined : v
}

function hostForUrl (host: string): string {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
  return h.includes(':') ? `[${h}]` : h
}

function parsePort (value: string, what: string): number {
  if (!/^\d{1,5}$/.test(value) || Number(value) < 1 || Number(value) > 65535) {
    throw new Error(`${what} must be a port number from 1 to 65535 (got ${JSON.stringify(value)})`)
  }
  return Number(value)
}

function checkHost (host: string, what: string): void {
  if (!/^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*|[A-Za-z0-9._-]+)$/.test(host)) {
    throw new Error(`${what} is not a host name or address (got ${JSON.stringify(host)})`)
  }
}

/**
 * Splits `key=value;key=value` as .NET does: keys are case-insensitive, a value may be quoted with
 * `"` or `'` (a doubled quote inside stands for one) to contain `;` or `=`, blanks around keys and
 * unquoted values are ignored. Returns lower-case keys with their spaces removed.
 */
function splitConnectionString (s: string): Map<string, string> {
  const out = new Map<string, string>()
  let i = 0
  while (i < s.length) {
    while (i < s.length && (s[i] === ';' || /\s/.test(s[i]))) i++
    if (i >= s.length) break
    const eq = s.indexOf('=', i)
    const semi = s.indexOf(';', i)
    if (eq === -1 || (semi !== -1 && semi < eq)) {
      const part = s.slice(i, semi === -1 ? undefined : semi).trim()
      throw new Error(`connection string part ${JSON.stringify(part)} is not key=value`)
    }
    const rawKey = s.slice(i, eq).trim()
    if (rawKey === '') throw new Error('connection string has a value without a key')
    const key = rawKey.toLowerCase().replace(/\s+/g, '')
    i = eq + 1
    while (i < s.length && s[i] !== ';' && /\s/.test(s[i])) i++
    let value = ''
    const quote = s[i]
    if (quote === '"' || quote === "'") {
      i++
      for (;;) {
        if (i >= s.length) throw new Error(`connection string value of ${rawKey} has no closing ${quote}`)
        if (s[i] === quote) {
          if (s[i + 1] === quote) { value += quote; i += 2; continue }
          i++
          break
        }
        value += s[i++]
      }
      while (i < s.length && s[i] !== ';') {
        if (!/\s/.test(s[i])) throw new Error(`connection string value of ${rawKey} has text after its closing quote`)
        i++
      }
    } else {
      const end = s.indexOf(';', i)
      value = s.slice(i, end === -1 ? undefined : end).trim()
      i = end === -1 ? s.length : end
    }
    out.set(key, value)
  }
  return out
}

function pick (parts: Map<string, string>, keys: string[]): string | undefined {
  for (const k of keys) {
    const v = parts.get(k)
    if (v !== undefined) return v
  }
  return undefined
}

/**
 * `Server=h;Port=p;Database=d;User=u;Password=pw;` (keys case-insensitive; `Host`, `Uid`,
 * `User Id`, `Username`, `Pwd` accepted too; other options such as `SslMode` ignored) →
 * `mysql://u:pw@h:p/d`. Throws an Error saying what is wrong.
 */
export function parseLegacyMariaDb (s: string): string {
  if (typeof s !== 'string' || s.trim() === '') throw new Error('connection string is empty')
  const parts = splitConnectionString(s)
  const host = nonEmpty(pick(parts, HOST_KEYS))?.trim()
  if (host === undefined) throw new Error('connection string names no Server')
  if (host.includes(',')) throw new Error(`connection string names several servers (${host}); give one`)
  checkHost(host, 'Server')
  const portText = nonEmpty(pick(parts, PORT_KEYS))
  const port = portText === undefined ? 3306 : parsePort(portText.trim(), 'Port')
  const database = nonEmpty(pick(parts, DATABASE_KEYS))
  if (database === undefined) throw new Error('connection string names no Database')
  const user = nonEmpty(pick(parts, USER_KEYS))
  const password = pick(parts, PASSWORD_KEYS) ?? ''
  let auth = ''
  if (user !== undefined) {
    auth = encodeURIComponent(user) + (password === '' ? '' : `:${encodeURIComponent(password)}`) + '@'
  } else if (password !== '') {
    throw new Error('connection string has a Password but no User')
  }
  return `mysql://${auth}${hostForUrl(host)}:${port}/${encodeURIComponent(database)}`
}

/**
 * StackExchange.Redis form `host:port[,password=pw][,ssl=true][,...]` → `redis://[:pw@]host:port`
 * (`rediss://` when `ssl=true`). Other options (abortConnect, connectTimeout, ...) are ignored.
 */
export function parseLegacyRedis (s: string): string {
  if (typeof s !== 'string' || s.trim() === '') throw new Error('connection string is empty')
  const parts = s.split(',').map(p => p.trim()).filter(p => p !== '')
  let endpoint: string | undefined
  let password = ''
  let user = ''
  let ssl = false
  let db: number | undefined
  for (const part of parts) {
    const eq = part.indexOf('=')
    if (eq === -1) {
      if (endpoint !== undefined) throw new Error(`connection string names several endpoints (${endpoint}, ${part}); give one`)
      endpoint = part
      continue
    }
    const key = part.slice(0, eq).trim().toLowerCase()
    const value = part.slice(eq + 1).trim()
    if (key === 'password') password = value
    else if (key === 'user') user = value
    else if (key === 'ssl') {
      if (!/^(true|false)$/i.test(value)) throw new Error(`ssl must be true or false (got ${JSON.stringify(value)})`)
      ssl = value.toLowerCase() === 'true'
    } else if (key === 'defaultdatabase') {
      if (!/^\d+$/.test(value)) throw new Error(`defaultDatabase must be a number (got ${JSON.stringify(value)})`)
      db = Number(value)
    }
  }
  if (endpoint === undefined) throw new Error('connection string names no host:port')
  let host = endpoint
  let port = 6379
  const bracketed = /^\[([^\]]+)\](?::(.*))?$/.exec(endpoint)
  if (bracketed !== null) {
    host = bracketed[1]
    if (bracketed[2] !== undefined) port = parsePort(bracketed[2], 'the port')
  } else if ((endpoint.match(/:/g) ?? []).length === 1) {
    const colon = endpoint.indexOf(':')
    host = endpoint.slice(0, colon)
    port = parsePort(endpoint.slice(colon + 1), 'the port')
  }
  if (host === '') throw new Error('connection string names no host')
  checkHost(host, 'the host')
  const auth = password === '' && user === ''
    ? ''
    : `${encodeURIComponent(user)}${password === '' ? '' : `:${encodeURIComponent(password)}`}@`
  return `${ssl ? 'rediss' : 'redis'}://${auth}${hostForUrl(host)}:${port}${db === undefined ? '' : `/${db}`}`
}

/**
 * The MariaDB URL from `MARIADB_URL`, else from the legacy `ConnectionStrings__MariaDb`, else
 * undefined. Throws an Error naming the variable when its value cannot be used.
 */
export function mariaDbUrlFromEnv (env: NodeJS.ProcessEnv): string | undefined {
  const url = nonEmpty(env.MARIADB_URL)?.trim()
  if (url !== undefined) {
    let parsed: URL
    try {
      parsed = new URL(url)
    } catch {
      throw new Error('MARIADB_URL is not a URL: expected mysql://user:pass@host:port/database')
    }
    if (parsed.protocol !== 'mysql:' && parsed.protocol !== 'mariadb:') {
      throw new Error(`MARIADB_URL must start with mysql:// (got ${parsed.protocol}//)`)
    }
    if (parsed.hostname === '') throw new Error('MARIADB_URL names no host')
    return url
  }
  const legacy = nonEmpty(env.ConnectionStrings__MariaDb)
  if (legacy !== undefined) {
    try {
      return parseLegacyMariaDb(legacy)
    } catch (err) {
      throw new Error(`ConnectionStrings__MariaDb: ${(err as Error).message}`)
    }
  }
  return undefined
}

export interface HostPort {
  host: string
  port: number
}

/**
 * `host:port,host:port` (IPv6 as `[::1]:26379`; a missing port is `defaultPort`), as
 * `REDIS_SENTINELS` and `REDIS_CLUSTER_NODES` take them. Throws an Error saying what is wrong.
 */
export function parseHostPortList (s: string, defaultPort: number): HostPort[] {
  const out: HostPort[] = []
  for (const raw of s.split(',')) {
    const item = raw.trim()
    if (item === '') continue
    const bracketed = /^\[([^\]]+)\](?::(.*))?$/.exec(item)
    let host = item
    let port = defaultPort
    if (bracketed !== null) {
      host = bracketed[1]
      if (bracketed[2] !== undefined) port = parsePort(bracketed[2], `the port of ${item}`)
    } else if ((item.match(/:/g) ?? []).length === 1) {
      host = item.slice(0, item.indexOf(':'))
      port = parsePort(item.slice(item.indexOf(':') + 1), `the port of ${item}`)
    }
    if (host === '') throw new Error(`${JSON.stringify(item)} names no host`)
    checkHost(host, JSON.stringify(item))
    out.push({ host, port })
  }
  if (out.length === 0) throw new Error('expected host:port,host:port (got no address)')
  return out
}
