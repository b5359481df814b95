// The Redis topology variables, LEASE_STORE and unknown REDIS_*/MARIADB_* variables (issue 12),
// through the real server process (`server.ts`) where the start itself is what is tested.
import t from 'tap'
import { spawn } from 'node:child_process'
import { tmpdir } from 'node:os'
import { fileURLToPath } from 'node:url'
import { Value } from '@sinclair/typebox/value'
import { clusterKeyPrefix, EnvSchema, resolveConfig, unknownVariables, type Env } from '../services/config/config.js'
import { redisConnections, type RedisConnection } from '../services/config/redis-connections.js'
import { startGateway } from './helpers/gateway.js'
import { SERVER, TS_LOADER } from './helpers/ts-loader.js'


interface Run { code: number | null, stdout: string, stderr: string, url?: string, kill: () => void }

/**
 * `server.ts` with only `env` (and what Node needs), run from a scratch directory so no `.env`
 * is read; resolves when it exits or listens.
 */
async function runServer (t: { teardown: (fn: () => void) => void }, env: Record<string, string>): Promise<Run> {
  const proc = spawn(process.execPath, [...TS_LOADER, SERVER], {
    cwd: tmpdir(),
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', PORT: '0', HOST: '127.0.0.1', ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.teardown(() => { if (proc.exitCode == null) proc.kill('SIGKILL') })
  const run: Run = { code: null, stdout: '', stderr: '', kill: () => proc.kill('SIGTERM') }
  proc.stderr.on('data', (d: Buffer) => { run.stderr += d.toString() })
  return await new Promise((resolve) => {
    proc.stdout.on('data', (d: Buffer) => {
      run.stdout += d.toString()
      const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(run.stdout)
      if (m != null && run.url == null) {
        run.url = m[1]
        resolve(run)
      }
    })
    proc.once('exit', (code) => { run.code = code; resolve(run) })
  })
}

// Kubernetes gives every pod these for a Service named `redis`; REDIS_PASWORD is a typo.
const STRAY = {
  REDIS_SERVICE_HOST: '10.0.0.7',
  REDIS_PORT: 'tcp://10.0.0.7:6379',
  REDIS_PASWORD: 'hunter2-secret',
  MARIADB_HOST: 'db'
}

t.test('production with no lease store: the start stops with one line saying what to set', async (t) => {
  const run = await runServer(t, { NODE_ENV: 'production', INVENTORY_FILE: fileURLToPath(new URL('../inventory.default.json', import.meta.url)) })
  t.equal(run.code, 1, 'exit code 1')
  t.equal(run.url, undefined, 'never listened')
  const lines = run.stderr.trim().split('\n')
  t.equal(lines.length, 1, `one line: ${run.stderr.trim()}`)
  t.match(lines[0], /LEASE_STORE.*REDIS_URL, REDIS_SENTINELS or REDIS_CLUSTER_NODES.*LEASE_STORE=memory/)
})

t.test('LEASE_STORE=memory in production starts; unknown REDIS_*/MARIADB_* variables are named in one warning', async (t) => {
  const run = await runServer(t, { NODE_ENV: 'production', LEASE_STORE: 'memory', ...STRAY })
  t.ok(run.url, `listening (${run.stderr.trim()})`)
  const logs = run.stdout.trim().split('\n').map((l) => JSON.parse(l) as { level: number, msg: string, variables?: string[] })
  const warnings = logs.filter((l) => l.level === 40 && l.variables != null)
  t.equal(warnings.length, 1, 'one warning')
  t.same(warnings[0]?.variables, ['MARIADB_HOST', 'REDIS_PASWORD', 'REDIS_PORT', 'REDIS_SERVICE_HOST'], 'naming each unknown variable')
  t.notMatch(run.stdout, /hunter2-secret/, 'never a value (it may be a secret)')
  const health = await (await fetch(`${run.url as string}/health`)).json()
  t.match(health, { status: 'ok', redis: 'unused', redisTopology: 'memory', leases: { store: 'memory' } })
  run.kill()
})

function env (vars: Record<string, string>): Env {
  return Value.Default(EnvSchema, Value.Convert(EnvSchema, vars)) as Env
}

t.test('the topology variables', async (t) => {
  const sentinel = resolveConfig(env({ REDIS_SENTINELS: 'a:26379, [::1]:26380,b', REDIS_SENTINEL_MASTER: 'm', REDIS_PASSWORD: 'pw', REDIS_SENTINEL_PASSWORD: 'spw', REDIS_TLS: 'true' }))
  t.same(sentinel.redis, {
    kind: 'sentinel',
    sentinels: [{ host: 'a', port: 26379 }, { host: '::1', port: 26380 }, { host: 'b', port: 26379 }],
    master: 'm',
    auth: { username: undefined, password: 'pw', sentinelUsername: undefined, sentinelPassword: 'spw', tls: true, sentinelTls: false }
  })
  t.equal(sentinel.redisKeyPrefix, 'maestro:', 'Sentinel keeps the prefix')
  const cluster = resolveConfig(env({ REDIS_CLUSTER_NODES: 'n1:7000,n2:7001' }))
  t.match(cluster.redis, { kind: 'cluster', nodes: [{ host: 'n1', port: 7000 }, { host: 'n2', port: 7001 }] })
  t.equal(cluster.redisKeyPrefix, '{maestro}:', 'Cluster puts the prefix under one hash tag')
  t.equal(clusterKeyPrefix('ai:prod:'), '{ai:prod}:')
  t.equal(clusterKeyPrefix('fleet'), '{fleet}')
  t.equal(clusterKeyPrefix('{fleet-a}:'), '{fleet-a}:', 'a prefix with a tag is kept')
  t.match(resolveConfig(env({ ConnectionStrings__Redis: 'h:6380,password=x' })).redis, { kind: 'standalone', url: 'redis://:x@h:6380' })
  t.equal(resolveConfig(env({ REDIS_URL: 'redis://h', LEASE_STORE: 'memory' })).redis, undefined, 'LEASE_STORE=memory keeps leases in memory')
  t.equal(resolveConfig(env({})).redis, undefined, 'outside production, no Redis means memory')
  t.throws(() => resolveConfig(env({ REDIS_URL: 'redis://h', REDIS_SENTINELS: 's:26379' })), /REDIS_SENTINELS: set only one of REDIS_URL, REDIS_SENTINELS/)
  t.throws(() => resolveConfig(env({ LEASE_STORE: 'redis' })), /LEASE_STORE: redis needs REDIS_URL/)
  t.throws(() => resolveConfig(env({ REDIS_CLUSTER_NODES: 'n1:99999' })), /REDIS_CLUSTER_NODES: the port of n1:99999 must be a port number/)
  t.throws(() => resolveConfig(env({ REDIS_SENTINELS: ' , ' })), /REDIS_SENTINELS: expected host:port/)
  t.same(unknownVariables([{ REDIS_URL: 'x', REDIS_SENTINELS: 'x', MARIADB_URL: 'x', LOG_LEVEL: 'x' }, { REDIS_PORT_6379_TCP: 'x' }]), ['REDIS_PORT_6379_TCP'])
})

t.test('a bad LEASE_STORE value stops the gateway with an error naming it', async (t) => {
  await t.rejects(startGateway(t, { LEASE_STORE: 'disk' as never }), /LEASE_STORE/)
})

t.test('the password and TLS variables reach the ioredis connections of each topology', async (t) => {
  // Real ioredis objects, pointed at a port nobody listens on (they are only looked at, then closed).
  const opened: RedisConnection[] = []
  const connections = (vars: Record<string, string>): Array<Record<string, any>> => {
    const topology = resolveConfig(env(vars)).redis
    if (topology == null) throw new Error('no Redis topology')
    const { client, subscriber } = redisConnections(topology)
    for (const c of [client, subscriber]) {
      c.on('error', () => {})
      opened.push(c)
    }
    return [client, subscriber].map((c) => (c as unknown as { options: Record<string, any> }).options)
  }
  t.teardown(() => { for (const c of opened) c.disconnect() })
  const secrets = { REDIS_USERNAME: 'u', REDIS_PASSWORD: 'pw', REDIS_SENTINEL_USERNAME: 'su', REDIS_SENTINEL_PASSWORD: 'spw' }

  for (const o of connections({ REDIS_SENTINELS: '127.0.0.1:1', REDIS_SENTINEL_MASTER: 'm', ...secrets, REDIS_TLS: 'true', REDIS_SENTINEL_TLS: 'true' })) {
    t.match(o, { name: 'm', role: 'master', username: 'u', password: 'pw', sentinelUsername: 'su', sentinelPassword: 'spw', enableTLSForSentinelMode: true },
      'Sentinel: data-node and sentinel credentials')
    t.ok(o.tls != null && o.sentinelTLS != null, 'Sentinel: TLS to the data nodes and to the sentinels')
  }
  for (const o of connections({ REDIS_SENTINELS: '127.0.0.1:1', REDIS_PASSWORD: 'pw' })) {
    t.ok(o.tls == null && o.sentinelTLS == null && o.enableTLSForSentinelMode !== true, 'Sentinel: no TLS unless asked for')
  }
  for (const o of connections({ REDIS_CLUSTER_NODES: '127.0.0.1:1', ...secrets, REDIS_TLS: 'true' })) {
    t.match(o.redisOptions, { username: 'u', password: 'pw' }, 'Cluster: every node connection has the credentials')
    t.ok(o.redisOptions.tls != null, 'Cluster: and TLS')
  }
  for (const o of connections({ REDIS_URL: 'redis://127.0.0.1:1', REDIS_PASSWORD: 'pw', REDIS_TLS: 'true' })) {
    t.match(o, { password: 'pw' }, 'one Redis: REDIS_PASSWORD')
    t.ok(o.tls != null, 'one Redis: REDIS_TLS')
  }
  for (const o of connections({ REDIS_URL: 'redis://:inurl@127.0.0.1:1' })) {
    t.match(o, { password: 'inurl' }, 'a URL\'s own password is used')
  }
})
