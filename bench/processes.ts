/**
 * The bench's child processes: a free port, the gateway started as deployed (`node dist/server.js`
 * in an empty folder, NODE_ENV=production, inventory from a file, leases in Redis under a key
 * prefix of its own) and stopped, and those keys deleted afterwards.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Redis } from 'ioredis'
import { sleep } from './load.js'

const here = fileURLToPath(new URL('.', import.meta.url))

/** Children killed if this process exits first (one listener for all: the bench starts dozens). */
const children = new Set<ChildProcess>()
process.once('exit', () => { for (const child of children) child.kill('SIGKILL') })

/** However this process ends, `child` does not outlive it. */
export function killOnExit (child: ChildProcess): void {
  children.add(child)
  child.once('exit', () => children.delete(child))
}

export async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address != null ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

export interface GatewayProcessOptions {
  /** an empty folder: the cwd (so that no `.env` of the working tree changes what is measured) and the inventory's place */
  dir: string
  inventory: object
  /** the variables that differ from the deployed defaults (REDIS_URL, REDIS_KEY_PREFIX, LOG_LEVEL, …); undefined deletes one */
  env: Record<string, string | undefined>
  /** node flags */
  flags?: string[]
  /** the script to run; default the gateway, dist/server.js */
  script?: string
  /** its stdout (the log), when counted; otherwise read and thrown away */
  onLog?: (chunk: Buffer) => void
  /** named in errors */
  name?: string
}

/** A gateway process, answering /health. */
export async function startGatewayProcess (opts: GatewayProcessOptions): Promise<{ child: ChildProcess, url: string }> {
  const inventory = join(opts.dir, 'inventory.json')
  await writeFile(inventory, JSON.stringify(opts.inventory))
  const port = await freePort()
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const name of ['MARIADB_URL', 'ConnectionStrings__MariaDb', 'ConnectionStrings__Redis', 'API_KEYS', 'ADMIN_TOKEN']) delete env[name]
  Object.assign(env, { NODE_ENV: 'production', HOST: '127.0.0.1', PORT: String(port), INVENTORY_FILE: inventory })
  for (const [name, value] of Object.entries(opts.env)) {
    if (value === undefined) delete env[name]
    else env[name] = value
  }
  // stdout: a pipe, as under a container runtime
  const script = opts.script ?? join(here, '..', 'server.js')
  const child = spawn(process.execPath, [...(opts.flags ?? []), script], { cwd: opts.dir, env, stdio: ['ignore', 'pipe', 'pipe'] })
  if (opts.onLog != null) child.stdout?.on('data', opts.onLog)
  else child.stdout?.resume()
  killOnExit(child)
  let stderr = ''
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const url = `http://127.0.0.1:${port}`
  const name = opts.name ?? 'gateway'
  const deadline = Date.now() + 20_000
  for (;;) {
    if (child.exitCode != null) throw new Error(`the ${name} proxy exited at start: ${stderr.trim()}`)
    const ok = await fetch(`${url}/health`).then((r) => r.ok, () => false)
    if (ok) break
    if (Date.now() > deadline) throw new Error(`the ${name} proxy did not answer /health within 20 s: ${stderr.trim()}`)
    await sleep(100)
  }
  return { child, url }
}

export async function stopProcess (child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode != null || child.signalCode != null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill(signal)
  await exited
}

/** Deletes every key under `prefix`. */
export async function deleteKeys (redisUrl: string, prefix: string): Promise<void> {
  const client = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 })
  try {
    await client.connect()
    let cursor = '0'
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', prefix + '*', 'COUNT', 500)
      cursor = next
      if (keys.length > 0) await client.del(...keys)
    } while (cursor !== '0')
  } finally {
    client.disconnect()
  }
}
