// The deployment files (issue 12) checked against the code: every manifest parses, every variable
// it sets is one the gateway reads (and the whole set is accepted by the config), the probe paths
// are routes that answer, and the grace periods leave in-flight streams their SHUTDOWN_GRACE_MS.
import t from 'tap'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Value } from '@sinclair/typebox/value'
import { parseAllDocuments } from 'yaml'
import { EnvSchema, resolveConfig, ServerEnvSchema, serverSettings, type Env } from '../services/config/config.js'
import { startGateway } from './helpers/gateway.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const K8S = join(ROOT, 'deploy/kubernetes')
const KNOWN = new Set([...Object.keys(EnvSchema.properties), ...Object.keys(ServerEnvSchema.properties)])

function load (path: string): any[] {
  const docs = parseAllDocuments(readFileSync(path, 'utf8'))
  if (!Array.isArray(docs)) throw new Error(`${path}: empty`)
  for (const d of docs) if (d.errors.length > 0) throw new Error(`${path}: ${d.errors[0].message}`)
  return docs.map((d) => d.toJS())
}

const files = readdirSync(K8S).filter((f) => f.endsWith('.yaml')).sort()
const manifests = files.flatMap((f) => load(join(K8S, f)).map((doc) => ({ file: f, doc })))
const byKind = (kind: string): any[] => manifests.filter((m) => m.doc?.kind === kind).map((m) => m.doc)
const one = (kind: string): any => {
  const found = byKind(kind)
  if (found.length !== 1) throw new Error(`expected one ${kind}, found ${found.length}`)
  return found[0]
}

/** The settings as the config would see them, checked the way the gateway checks them at start. */
function accepted (vars: Record<string, string>): { env: Env, grace: number, port: number } {
  const env = Value.Default(EnvSchema, Value.Convert(EnvSchema, Object.fromEntries(Object.entries(vars).filter(([, v]) => v !== '')))) as Env
  const errors = [...Value.Errors(EnvSchema, env)].map((e) => `${e.path}: ${e.message}`)
  if (errors.length > 0) throw new Error(errors.join('; '))
  resolveConfig(env)
  const server = serverSettings([vars])
  return { env, grace: server.shutdownGraceMs, port: server.port }
}

t.test('every Kubernetes manifest parses, and the kustomization lists them all', async (t) => {
  t.ok(files.length >= 7, `${files.length} files`)
  for (const m of manifests) t.ok(m.doc?.apiVersion != null && m.doc?.kind != null, `${m.file}: ${m.doc?.kind as string}`)
  const listed = [...one('Kustomization').resources].sort()
  t.same(listed, files.filter((f) => f !== 'kustomization.yaml'), 'kustomization.yaml lists every manifest')
  for (const kind of ['Deployment', 'Service', 'PodDisruptionBudget', 'HorizontalPodAutoscaler', 'ConfigMap', 'Secret']) {
    t.equal(byKind(kind).length, 1, `one ${kind}`)
  }
})

t.test('the Deployment: variables the gateway knows, probes on its routes, grace above SHUTDOWN_GRACE_MS', async (t) => {
  const deployment = one('Deployment')
  const config = one('ConfigMap')
  const secret = one('Secret')
  const pod = deployment.spec.template.spec
  const [container] = pod.containers
  const vars: Record<string, string> = { ...config.data, ...secret.stringData }
  const unknown = [...Object.keys(vars), ...(container.env ?? []).map((e: { name: string }) => e.name)].filter((n) => !KNOWN.has(n))
  t.same(unknown, [], 'every variable in the ConfigMap and Secret is one the config reads')
  const refs = container.envFrom.map((e: any) => e.configMapRef?.name ?? e.secretRef?.name)
  t.same(refs, [config.metadata.name, secret.metadata.name], 'the container takes its variables from them')
  const { env, grace, port: listening } = accepted(vars)
  t.equal(env.NODE_ENV, 'production')
  t.ok(env.REDIS_SENTINELS != null || env.REDIS_CLUSTER_NODES != null || env.REDIS_URL != null, 'a shared lease store is configured')

  // Probes: the paths are gateway routes that answer 200 when it is healthy, on the container port.
  const port = container.ports.find((p: any) => p.name === container.readinessProbe.httpGet.port)
  t.equal(port?.containerPort, listening, 'probes reach the port the gateway listens on')
  t.equal(container.readinessProbe.httpGet.path, '/health/ready')
  t.equal(container.livenessProbe.httpGet.path, '/health/live')
  const gw = await startGateway(t, { LEASE_STORE: 'memory', INVENTORY_FILE: join(ROOT, 'inventory.default.json') })
  for (const probe of [container.readinessProbe, container.livenessProbe, container.startupProbe].filter(Boolean)) {
    const res = await gw.app.inject({ method: 'GET', url: probe.httpGet.path })
    t.equal(res.statusCode, 200, `GET ${probe.httpGet.path as string} answers 200`)
  }

  // preStop pause, then SIGTERM: the drain needs SHUTDOWN_GRACE_MS before the kill.
  const preStop = container.lifecycle.preStop
  const pauseSeconds = preStop.sleep?.seconds ?? Number(preStop.exec.command[1])
  t.same(preStop.exec?.command?.[0] ?? 'sleep', 'sleep', 'preStop sleeps')
  t.ok(pauseSeconds >= 3, `preStop pauses ${pauseSeconds as number} s while endpoints update`)
  t.ok(pod.terminationGracePeriodSeconds * 1000 > pauseSeconds * 1000 + grace,
    `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds as number} s > preStop ${pauseSeconds as number} s + SHUTDOWN_GRACE_MS ${grace} ms`)

  t.equal(pod.securityContext.runAsNonRoot, true, 'non-root')
  t.equal(container.securityContext.readOnlyRootFilesystem, true, 'read-only root filesystem')
  t.equal(container.securityContext.allowPrivilegeEscalation, false)
  t.ok(container.resources.requests.cpu != null && container.resources.requests.memory != null && container.resources.limits.memory != null, 'resources set')
})

t.test('the Service, PodDisruptionBudget and autoscaler point at the Deployment', async (t) => {
  const deployment = one('Deployment')
  const labels = deployment.spec.template.metadata.labels
  t.same(deployment.spec.selector.matchLabels, labels, 'the Deployment selects its pods')
  t.same(one('Service').spec.selector, labels, 'the Service selects the gateway pods')
  t.equal(one('Service').spec.ports[0].targetPort, deployment.spec.template.spec.containers[0].ports[0].name)
  t.same(one('PodDisruptionBudget').spec.selector.matchLabels, labels, 'the PodDisruptionBudget covers them')
  const hpa = one('HorizontalPodAutoscaler')
  t.same(hpa.spec.scaleTargetRef, { apiVersion: 'apps/v1', kind: 'Deployment', name: deployment.metadata.name })
  t.ok(hpa.spec.minReplicas >= 2 && hpa.spec.minReplicas > one('PodDisruptionBudget').spec.minAvailable - 1, 'at least two replicas')
  const job = one('Job').spec.template.spec.containers[0]
  t.same(job.command, ['node', 'dist/scripts/migrate.js'], 'the migration Job runs the migrations')
  t.same(job.env.map((e: { name: string }) => e.name).filter((n: string) => !KNOWN.has(n)), [], 'with variables the gateway knows')
})

/** `${NAME:?msg}` / `${NAME:-default}` as compose fills them, from `values` (a required one missing throws). */
function interpolate (text: string, values: Record<string, string>): string {
  return text.replace(/\$\{(\w+)(?::([-?])([^}]*))?\}/g, (_m, name: string, op?: string, arg?: string) => {
    if (values[name] != null) return values[name]
    if (op === '-') return arg ?? ''
    throw new Error(`compose would stop: ${name} ${arg ?? 'unset'}`)
  })
}

t.test('the three-box Sentinel compose file', async (t) => {
  const box = { BOX_HOST: '192.168.1.11', REDIS_MASTER_HOST: '192.168.1.11', SENTINELS: '192.168.1.11:26379,192.168.1.12:26379,192.168.1.13:26379', MARIADB_URL: 'mysql://maestro:pw@192.168.1.11:3306/maestro', REDIS_PASSWORD: 'pw' }
  const [compose] = parseAllDocuments(interpolate(readFileSync(join(ROOT, 'deploy/compose-sentinel.yaml'), 'utf8'), box)) as any[]
  t.same(compose.errors, [], 'parses')
  const services = compose.toJS().services
  t.ok(services.redis != null && services.sentinel != null && services.gateway != null, 'a Redis, a sentinel and a gateway on each box')
  const gateway = services.gateway.environment as Record<string, string>
  t.same(Object.keys(gateway).filter((n) => !KNOWN.has(n)), [], 'every gateway variable is one the config reads')
  const { env, grace } = accepted(gateway)
  t.equal(env.REDIS_SENTINELS?.split(',').length, 3, 'three sentinels')
  t.match(services.sentinel.command.join(' '), new RegExp(`sentinel monitor ${env.REDIS_SENTINEL_MASTER} `), 'the sentinels watch the master the gateway asks for')
  t.match(services.sentinel.command.join(' '), / 2"/, 'quorum of two')
  const stopGrace = Number(/^(\d+)s$/.exec(services.gateway.stop_grace_period)?.[1])
  t.ok(stopGrace * 1000 > grace, `stop_grace_period ${stopGrace} s > SHUTDOWN_GRACE_MS ${grace} ms`)
  t.equal(services.gateway.read_only, true, 'read-only root filesystem')
  t.match(services.redis.command.join(' '), /--save "" --appendonly no/, 'Redis restores no stale leases')
  const migrate = services.migrate.environment as Record<string, string>
  t.same(Object.keys(migrate).filter((n) => !KNOWN.has(n)), [], 'the migration\'s variables too')
})

t.test('docker/compose.yaml (one box): the gateway\'s variables are ones the config reads', async (t) => {
  const [compose] = parseAllDocuments(interpolate(readFileSync(join(ROOT, 'docker/compose.yaml'), 'utf8'), {})) as any[]
  t.same(compose.errors, [], 'parses')
  const gateway = compose.toJS().services.gateway
  t.same(Object.keys(gateway.environment).filter((n) => !KNOWN.has(n)), [], 'every variable known')
  const { grace } = accepted(gateway.environment)
  t.ok(Number(/^(\d+)s$/.exec(gateway.stop_grace_period)?.[1]) * 1000 > grace, 'stop_grace_period above SHUTDOWN_GRACE_MS')
})
