//! The `/v1` routes and the system endpoints.

mod certificates;
mod events;
mod exec;
mod images;
mod instances;
mod join;
mod rollouts;
mod secrets;
mod services;
mod system;
mod tenants;
mod tokens;

use utoipa_actix_web::scope;
use utoipa_actix_web::service_config::ServiceConfig;

/// Registers every route (with its OpenAPI path item).
pub(crate) fn configure(cfg: &mut ServiceConfig) {
    cfg.service(system::healthz).service(system::readyz).service(system::metrics).service(
        scope("/v1")
            .service(system::whoami)
            .service(system::ca_pem)
            .service(tenants::create_tenant)
            .service(tenants::list_tenants)
            .service(tenants::get_tenant)
            .service(tenants::update_tenant)
            .service(tenants::delete_tenant)
            .service(tokens::create_token)
            .service(tokens::list_tokens)
            .service(tokens::revoke_token)
            .service(join::create_join_token)
            .service(join::list_join_tokens)
            .service(join::revoke_join_token)
            .service(join::join)
            .service(secrets::set_secret)
            .service(secrets::list_secrets)
            .service(secrets::delete_secret)
            .service(services::create_service)
            .service(services::list_services)
            .service(services::get_service)
            .service(services::update_service)
            .service(services::verify_domain)
            .service(certificates::upload_certificate)
            .service(certificates::list_certificates)
            .service(certificates::get_certificate)
            .service(certificates::delete_certificate)
            .service(services::delete_service)
            .service(rollouts::create_rollout)
            .service(rollouts::list_rollouts)
            .service(rollouts::get_rollout)
            .service(rollouts::cancel_rollout)
            .service(rollouts::set_autoscale)
            .service(rollouts::delete_autoscale)
            .service(instances::create_instance)
            .service(instances::list_instances)
            .service(instances::get_instance)
            .service(instances::delete_instance)
            .service(instances::start_instance)
            .service(instances::stop_instance)
            .service(instances::move_instance)
            .service(exec::exec_instance)
            .service(instances::instance_logs)
            .service(images::create_image)
            .service(images::list_images)
            .service(images::get_image)
            .service(images::export_image)
            .service(images::delete_image)
            .service(events::stream_events),
    );
}

/// Wraps a page of items with its cursor for the response.
pub(crate) fn page<T>(items: Vec<T>, next: Option<cloud_store::Cursor>) -> cloud_domain::api::Page<T> {
    cloud_domain::api::Page { items, next_cursor: next.map(|c| c.encode()) }
}
