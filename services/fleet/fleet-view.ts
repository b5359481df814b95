import type { ApiKeyInfo } from '../clients/api-keys.js'
import type { FleetSnapshot } from './fleet-snapshot.js'

/*
 * What each reader of `GET /gpu/events` may be told (CONTRACT 18, the fleet feed). The feed is
 * built once for the whole fleet; every reader is sent the view of it that its rights allow.
 */

/**
 * Who reads the feed:
 * - `operator`: everything (server addresses, loaded models, every client's requests, the admin
 *   API's settings);
 * - `key`: the public view plus that key's own recent requests;
 * - `public`: what the open `GET /gpu/status` tells — GPUs, their leases and models, queue depths —
 *   and the console's plain picture of the servers (name, model, GPUs, slots, health).
 */
export type FleetViewer =
  | { kind: 'operator' }
  | { kind: 'key', name: string }
  | { kind: 'public' }

export const OPERATOR: FleetViewer = { kind: 'operator' }
export const PUBLIC: FleetViewer = { kind: 'public' }

export interface FleetViewerInputs {
  /** the credential the request presented and the gateway knows */
  credential: Pick<ApiKeyInfo, 'name'> | 'admin' | null
  /** whether API keys or ADMIN_TOKEN are configured */
  secured: boolean
  /** whether the request came over the loopback interface (the socket's address) */
  loopback: boolean
}

/**
 * The viewer a request is. With keys or a token configured the whole feed takes the admin token.
 * With neither, the gateway's operator is whoever may use its admin API: a client on loopback
 * (CONTRACT 18, no ADMIN_TOKEN); anyone else sees the public view.
 */
export function fleetViewerOf ({ credential, secured, loopback }: FleetViewerInputs): FleetViewer {
  if (credential === 'admin') return OPERATOR
  if (credential != null) return { kind: 'key', name: credential.name }
  if (!secured && loopback) return OPERATOR
  return PUBLIC
}

/** One name per distinct view, so readers that see the same are sent the same frames. */
export function fleetViewKey (viewer: FleetViewer): string {
  return viewer.kind === 'key' ? `key:${viewer.name}` : viewer.kind
}

/**
 * The part of `snapshot` that `viewer` may see. The operator's view is the snapshot itself; the
 * others leave out server and replica addresses, loaded models, the admin API's settings, which
 * lease store is used, and every recent request but a key's own.
 */
export function fleetView (snapshot: FleetSnapshot, viewer: FleetViewer): FleetSnapshot {
  if (viewer.kind === 'operator') return snapshot
  const view: FleetSnapshot = {
    at: snapshot.at,
    replica: snapshot.replica,
    // which record kinds the console can offer to edit (the routes are public in /docs anyway); not whether a token guards them
    admin: { resources: snapshot.admin.resources },
    computers: snapshot.computers.map(({ ip: _ip, ...computer }) => computer),
    gpus: snapshot.gpus,
    assignments: snapshot.assignments.map(({ address: _address, loaded: _loaded, ...assignment }) => assignment),
    queues: snapshot.queues,
    replicas: snapshot.replicas.map((r) => ({ id: r.id }))
  }
  if (viewer.kind === 'key') {
    view.recent = (snapshot.recent ?? []).filter((r) => r.client === viewer.name)
    view.recentLimit = snapshot.recentLimit
  }
  return view
}
