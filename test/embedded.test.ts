// Embedded mode (CONTRACT section 10): `npm start` from a fresh copy of the repository, with no
// MariaDB and no Redis configured, reads its inventory from INVENTORY_FILE, keeps leases in memory,
// answers /health and proxies a chat (issue 5). Builds the copy first (npm start's prestart).
import t from 'tap'
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { mkdtemp, rm, symlink } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { Ollama } from 'ollama'
import { embeddedEnv, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

t.setTimeout(240_000)

/** The repository as a fresh clone has it (committed files, no dist/, no .env), sharing node_modules. */
async function freshCopy (t: Parameters<typeof writeInventoryFile>[0]): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'maestro-clone-'))
  t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })
  await promisify(execFile)('sh', ['-c', `git -C "${ROOT}" archive HEAD | tar -xf - -C "${dir}"`])
  await symlink(join(ROOT, 'node_modules'), join(dir, 'node_modules'))
  return dir
}

interface Started { child: ChildProcess, url: string, lines: () => any[], exited: Promise<number | null> }

/** `npm start` in its own process group; resolves once the server says where it listens. */
async function npmStart (cwd: string, env: NodeJS.ProcessEnv): Promise<Started> {
  const child = spawn('npm', ['start'], { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stdout?.setEncoding('utf8').on('data', (s: string) => { out += s })
  child.stderr?.setEncoding('utf8').on('data', (s: string) => { err += s })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const lines = (): any[] => out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
  const deadline = Date.now() + 180_000
  for (;;) {
    const listening = lines().find((l) => typeof l.msg === 'string' && l.msg.startsWith('Server listening at '))
    if (listening != null) return { child, url: listening.msg.slice('Server listening at '.length), lines, exited }
    if (child.exitCode != null || Date.now() > deadline) throw new Error(`npm start did not come up:\n${out}\n${err}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

t.test('npm start with no MariaDB and no Redis: inventory from a file, leases in memory, a chat goes through', async (t) => {
  const sim = await startSimulator({ models: ['llama3.2:latest'] })
  t.teardown(() => sim.close())
  const inventory = await writeInventoryFile(t, [{ name: 'local-ollama', model: '*', port: sim.port, gpus: [1] }])
  const copy = await freshCopy(t)
  const server = await npmStart(copy, embeddedEnv({ INVENTORY_FILE: inventory, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info' }))
  t.teardown(() => { if (server.child.exitCode == null) process.kill(-(server.child.pid as number), 'SIGKILL') })

  const health = await fetch(`${server.url}/health`)
  t.equal(health.status, 200)
  t.match(await health.json(), { status: 'ok', mariadb: 'unused', redis: 'unused', inventory: { source: 'file', ok: true }, leases: { store: 'memory' } })

  const ollama = new Ollama({ host: server.url })
  const chat = await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hello' }] })
  t.equal(chat.done, true)
  t.ok(chat.message.content.length > 0)
  const parts: string[] = []
  for await (const part of await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'again' }], stream: true })) parts.push(part.message.content)
  t.ok(parts.length > 1, 'streamed through')
  t.equal(sim.requests.filter((r) => r.path === '/api/chat').length, 2, 'both chats reached the simulated upstream')

  // SIGTERM to the server process itself (its pid is in every log line); npm exits with its code.
  process.kill(server.lines()[0].pid, 'SIGTERM')
  t.equal(await server.exited, 0, 'SIGTERM: a clean exit')
  t.ok(server.lines().some((l) => l.signal === 'SIGTERM'), 'the server logged its shutdown')

  const lines = server.lines()
  t.ok(lines.some((l) => /no MARIADB_URL: inventory read from a file/.test(l.msg)), 'the start log says where the inventory comes from')
  t.ok(lines.some((l) => /leases are kept in process memory/.test(l.msg)), 'and that leases are in memory')
  const finished = lines.filter((l) => l.msg === 'request finished')
  t.equal(finished.length, 2, 'one line per chat (the /health probe logs at debug)')
  t.match(finished[0], { route: '/api/chat', status: 200, model: 'llama3.2', assignment: 'local-ollama', gpus: '1' })
  t.equal(finished[0].reqId, finished[0].requestId, 'the log\'s request id is the one sent upstream')
  t.equal(lines.filter((l) => l.msg === 'incoming request' || l.msg === 'request completed').length, 0, 'no Fastify request lines')
})
