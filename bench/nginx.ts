/**
 * nginx as a plain reverse proxy in front of the same simulators, for the benchmark's yardstick:
 * what a well-tuned proxy with no leases, queues or logging costs on this machine.
 *
 * `location /<name>/` proxies to one simulator each (keep-alive to the upstream, no buffering, no
 * access log), so the load generator's clients reach the same upstream through nginx as they do
 * directly and through the gateway. Debian's `nginx-light` is installed when nginx is missing.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { killOnExit } from './processes.js'

const NGINX = '/usr/sbin/nginx'

/** nginx's binary, installing Debian's nginx-light when it is missing (the bench runs as root on CI-like machines). */
export function nginxBinary (): string {
  if (existsSync(NGINX)) return NGINX
  process.stderr.write('bench: nginx is missing; installing Debian nginx-light\n')
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
  spawnSync('apt-get', ['update'], { stdio: 'ignore', env })
  const install = spawnSync('apt-get', ['install', '-y', '--no-install-recommends', 'nginx-light'], { stdio: 'ignore', env })
  if (install.status !== 0 || !existsSync(NGINX)) throw new Error('nginx is not installed and `apt-get install -y nginx-light` failed')
  return NGINX
}

export interface NginxUpstream { name: string, port: number }

export function nginxConfig (dir: string, listenPort: number, upstreams: NginxUpstream[]): string {
  const blocks = upstreams.map((u) => `  upstream ${u.name} { server 127.0.0.1:${u.port}; keepalive 16; }`).join('\n')
  // Host as the upstream's own host:port (Ollama on loopback refuses other names, and so does the
  // simulator); set per location, as a location's proxy_set_header replaces the inherited ones.
  const locations = upstreams.map((u) => `    location /${u.name}/ { proxy_pass http://${u.name}/; proxy_set_header Host 127.0.0.1:${u.port}; proxy_set_header Connection ""; }`).join('\n')
  return httpConfig(dir, `${blocks}
  server {
    listen 127.0.0.1:${listenPort};
${locations}
  }`)
}

/** The process and http settings both configurations share, around their upstreams and server. */
function httpConfig (dir: string, body: string): string {
  return `daemon off;
master_process on;
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${join(dir, 'body')};
  proxy_temp_path ${join(dir, 'proxy')};
  fastcgi_temp_path ${join(dir, 'fastcgi')};
  uwsgi_temp_path ${join(dir, 'uwsgi')};
  scgi_temp_path ${join(dir, 'scgi')};
  keepalive_requests 100000;
  proxy_http_version 1.1;
  proxy_buffering off;
  proxy_request_buffering off;
${body}
}
`
}

/**
 * One upstream of `ports` balanced by nginx (`round-robin`, its default, or `least_conn`), every
 * path proxied to it: what a user puts in front of a fleet without a gateway (Scheduler v3's
 * scenarios). No buffering, so a streamed answer's first line passes at once.
 */
export function nginxBalancerConfig (dir: string, listenPort: number, ports: number[], method: 'round-robin' | 'least_conn'): string {
  const servers = ports.map((p) => `server 127.0.0.1:${p};`).join(' ')
  const balance = method === 'least_conn' ? 'least_conn; ' : ''
  return httpConfig(dir, `  upstream fleet { ${balance}${servers} keepalive 64; }
  server {
    listen 127.0.0.1:${listenPort};
    location / { proxy_pass http://fleet; proxy_set_header Host 127.0.0.1; proxy_set_header Connection ""; proxy_read_timeout 600s; }
  }`)
}

/**
 * Starts nginx in `dir` and waits until it answers. One worker: the gateway is one Node process
 * (one core's worth of event loop), so one nginx worker is the like-for-like comparison.
 */
export async function startNginx (dir: string, listenPort: number, upstreams: NginxUpstream[]): Promise<{ child: ChildProcess, url: string }> {
  await mkdir(dir, { recursive: true })
  return await launchNginx(dir, nginxConfig(dir, listenPort, upstreams), `http://127.0.0.1:${listenPort}`, `/${upstreams[0].name}/`)
}

/** nginx balancing over `ports` (nginxBalancerConfig). */
export async function startBalancingNginx (dir: string, listenPort: number, ports: number[], method: 'round-robin' | 'least_conn'): Promise<{ child: ChildProcess, url: string }> {
  await mkdir(dir, { recursive: true })
  return await launchNginx(dir, nginxBalancerConfig(dir, listenPort, ports, method), `http://127.0.0.1:${listenPort}`, '/')
}

async function launchNginx (dir: string, config: string, url: string, probePath: string): Promise<{ child: ChildProcess, url: string }> {
  const binary = nginxBinary()
  const conf = join(dir, 'nginx.conf')
  await writeFile(conf, config)
  const child = spawn(binary, ['-p', dir, '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] })
  killOnExit(child)
  let stderr = ''
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const probe = `${url}${probePath}`
  const deadline = Date.now() + 10_000
  for (;;) {
    if (child.exitCode != null) throw new Error(`nginx exited at start: ${stderr.trim()}`)
    if (await fetch(probe).then(() => true, () => false)) break
    if (Date.now() > deadline) throw new Error(`nginx did not answer within 10 s: ${stderr.trim()}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return { child, url }
}

export async function stopNginx (child: ChildProcess): Promise<void> {
  if (child.exitCode != null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGQUIT')
  await exited
}
